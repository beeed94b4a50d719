"""How every command line ends on a bad input: one line on stderr and an exit status.

  cli.run(main)      # instead of absl's app.run(main)

Status 2 (usage): a flag or config problem -- an unknown or missing flag, a config file that does
not load, a `--config.a.b` override naming no key or of the wrong type, a config value a check
refuses (`objectives.checks.ConfigError`). Status 1: any other error the run raises about its
inputs or state (ValueError and OSError with their own messages: a missing file, a bad row, a
locked workdir, ...). The line reads `error: <what, where, the fix>`; with `--verbosity=1` (or any
`--verbosity`) the traceback comes first. Any other exception is a bug and keeps its traceback.
"""
import os
import re
import sys
import traceback

from absl import app, flags, logging

from objectives.checks import ConfigError

USAGE = 2
FAILED = 1
# Raised for bad inputs and broken state, each with a message written for the user.
INPUT_ERRORS = (ValueError, OSError, FloatingPointError, RuntimeError)
# The flag that loads a config file lazily (ml_collections): read while parsing, so that a file
# that fails to load is a usage error too.
CONFIG_FLAGS = ("config",)


# absl's wording of two flag errors, rewritten to say the fix.
_REWRITES = (
    (r"^--(\w+)=None: Flag --\1 must have a value other than None\.$",
     r"--\1 is required; give --\1=<value> (--helpshort lists the flags)."),
    (r"^Missing value for flag (--\S+)$", r"\1 has no value; write \1=<value>."),
    (r"^(--\S+?)=(.*): (?:invalid literal for|could not convert string to) (int|float)\b.*$",
     r"\1=\2: not a valid \3; give the key a value of its type (\3)."),
)


def _verbose(argv):
  """Whether `--verbosity=N` (or `-v=N`) with N >= 1 is among `argv`."""
  for arg in argv:
    match = re.match(r"--?(?:verbosity|v)=(-?\d+)$", arg)
    if match and int(match.group(1)) >= 1:
      return True
  return False


_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raised_outside(error):
  """'file:line' where `error` was raised when that is not the project's own code (a library's
  error, perhaps a bug of ours), else None."""
  frames = traceback.extract_tb(error.__traceback__)
  if not frames:
    return None
  last = frames[-1]
  ours = last.filename.startswith(_PROJECT) and "site-packages" not in last.filename
  return None if ours else f"{os.path.basename(last.filename)}:{last.lineno}"


def one_line(error):
  """The user-facing line of `error`: a config file's own error (ml_collections wraps it into a
  traceback), the key and suggestion of a KeyError, and no newlines."""
  text = str(error)
  if "Traceback (most recent call last)" in text:
    head = text.split(": Error whilst", 1)[0] if text.startswith("flag --") else ""
    last = [line for line in text.splitlines() if line.strip()][-1]
    text = f"{head}: {last.split(': ', 1)[-1]}" if head else last
  text = text[len("flag "):] if text.startswith("flag --") else text
  text = " ".join(text.split())
  for pattern, replacement in _REWRITES:
    text = re.sub(pattern, replacement, text)
  return text


def _missing_key(error, argv):
  """`--config.a.b=1: config.a has no key 'b' (did you mean ...)` for a mistyped override."""
  root = error
  while root.__context__ is not None and not isinstance(root, KeyError):
    root = root.__context__
  lines = str(root.args[0] if root.args else root).splitlines()
  key = lines[0].strip("'\"\\")
  hint = " ".join(lines[1:]).strip()
  for arg in argv:
    path = arg.split("=", 1)[0].lstrip("-").split(".")
    if path[0] in CONFIG_FLAGS and key in path[1:]:
      parent = ".".join(path[:path.index(key, 1)])
      return (f"{arg}: {parent} has no key {key!r}"
              f"{f' ({hint})' if hint else ''}; see `{path[0]}` in the config file for its keys.")
  return f"no config key {key!r}{f' ({hint})' if hint else ''}."


def fail(error, status, verbose):
  """Prints the traceback (verbose only) and the one line, then exits with `status`."""
  if verbose:
    traceback.print_exception(error)
  message = one_line(error)
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _check_loaded(name, argv):
  """ml_collections keeps a config file that failed to load as an object that raises on use."""
  value = flags.FLAGS[name].value
  if isinstance(value, str):  # A plain string flag of that name (launch.sweep's).
    return
  try:
    value.keys()
  except OSError as e:
    arg = next((a for a in argv if a.startswith(f"--{name}=")), f"--{name}")
    last = [line for line in str(e).splitlines() if line.strip()][-1].strip()
    raise ValueError(f"{arg}: cannot load the config file ({last}); check the path.") from e


def _parse_flags(argv):
  """absl's flag parsing, with every failure (and a config file that does not load) as one line."""
  try:
    rest = flags.FLAGS(argv)
    for name in CONFIG_FLAGS:
      if name in flags.FLAGS and flags.FLAGS[name].present:
        _check_loaded(name, argv)
    return rest
  except (KeyError, AttributeError) as e:  # A `--config.x.y` naming no key.
    fail(ValueError(_missing_key(e, argv)), USAGE, _verbose(argv))
  except Exception as e:  # pylint: disable=broad-except
    fail(e, USAGE, _verbose(argv))


def guarded(main, extra_args=False):
  """`main` with its input errors turned into one line and a status; positional arguments are
  refused unless `extra_args`."""
  def wrapped(argv):
    if len(argv) > 1 and not extra_args:
      fail(ValueError(f"unexpected arguments {argv[1:]}; every option is a --flag=value."), USAGE,
           _verbose(sys.argv))
    try:
      return main(argv)
    except app.UsageError as e:
      fail(e, USAGE, _verbose(sys.argv))
    except ConfigError as e:
      fail(e, USAGE, _verbose(sys.argv))
    except INPUT_ERRORS as e:
      logging.flush()
      where = _raised_outside(e)
      if where and not _verbose(sys.argv):
        e = RuntimeError(f"{one_line(e)} (raised in {where}; --verbosity=1 shows the traceback)")
      fail(e, FAILED, _verbose(sys.argv))
  return wrapped


def run(main, extra_args=False):
  """absl's app.run(main) with one-line errors for flags, config and inputs."""
  app.run(guarded(main, extra_args), flags_parser=_parse_flags)
