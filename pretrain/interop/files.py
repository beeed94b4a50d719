"""The file names of every directory the project writes or reads, defined once.

An export directory holds the Hugging Face files (CONFIG_FILE, WEIGHTS_FILE, the tokenizer's),
our own Flax copy (MSGPACK_FILE + ENCODER_CONFIG_FILE), the sentence-transformers module files,
what the objective adds (retromae.DECODER_FILE; poolers.CONFIG_FILE / PARAMS_FILE) and README_FILE.
A workdir's own names are pretrain.training.checkpointing's (CHECKPOINTS_DIR, TOKENIZER_DIR).
"""
CONFIG_FILE = "config.json"                  # Hugging Face model config
WEIGHTS_FILE = "model.safetensors"           # Hugging Face weights
INDEX_FILE = "model.safetensors.index.json"  # Hugging Face sharded weights
MSGPACK_FILE = "flax_params.msgpack"         # every parameter of the objective, Flax msgpack
ENCODER_CONFIG_FILE = "encoder_config.json"  # pretrain.models.encoder.EncoderConfig as JSON
README_FILE = "README.md"                    # the model card
GENERATOR_DIR = "generator"                  # an ELECTRA export's generator (ElectraForMaskedLM)
