"""Reserved tokens and file names shared by `tokenizer` and `hf_tokenizer`."""

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
RESERVED = (PAD, UNK, CLS, SEP, MASK)
WORD_MARKER = "\u2581"  # "▁": sentencepiece's visible space / word start.
HF_FILE, SPM_FILE = "tokenizer.json", "spm.model"
