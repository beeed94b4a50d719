"""PROP: representative words prediction jointly with MLM (objectives/prop.py), on the demo setup.

  python -m pretrain.main --config=configs/prop.py --workdir=workdir/prop
  python -m pretrain.main --config=configs/prop.py:size=tiny,steps=20 --workdir=/tmp/w

Everything but the objective is configs/demo.py's; the objective is `combined` with components
"mlm:1.0,prop:1.0" over one encoder (the paper trains the two losses jointly), so validation
reports MLM accuracy next to PROP's pairwise accuracy. `lam` is the Poisson mean of the word-set
length (the paper samples it from a Poisson distribution), `mu` the Dirichlet smoothing.
"""
from configs import common, demo


def get_config(arg=None):
  a = common.parse_arg(arg, size="demo", steps=600, vocab_size=16000, batch_size=8, seq_len=128,
                       arch="bert", lam=3.0, mu=100.0, max_set=8, prop_weight=1.0)
  c = demo.get_config(f"size={a.size},steps={a.steps},vocab_size={a.vocab_size},"
                      f"batch_size={a.batch_size},seq_len={a.seq_len},arch={a.arch}")
  c.objective.update(name="combined", components=f"mlm:1.0,prop:{a.prop_weight}",
                     prop_lambda=a.lam, prop_mu=a.mu, prop_max_set=a.max_set)
  return c
