"""Command line: ``framp-jax train --config experiments/configs/NAME.py --workdir DIR
[--config.KEY=VALUE ...] [--resume]``."""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from framp_jax import distributed as _distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A get_config() file, e.g. experiments/configs/framp_cifar10_cpu.py; override "
    "fields with --config.KEY=VALUE.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (config.json, metrics.csv, results.json, "
                    "checkpoints, TensorBoard events, plots).")
flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its latest checkpoint.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
_distributed.define_flags()  # --distributed, --coordinator_address, --num_processes, --process_id
FLAGS = flags.FLAGS

COMMANDS = ("train",)


def _main(argv):
    cmd = argv[1:]
    if len(cmd) != 1 or cmd[0] not in COMMANDS:
        raise app.UsageError(f"usage: framp-jax {{{','.join(COMMANDS)}}} --config FILE --workdir DIR "
                             f"[--config.KEY=VALUE ...] [--resume]; got {cmd}")
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("framp-jax train needs --config FILE and --workdir DIR")
    # before any other use of JAX: afterwards jax.devices() lists every process's devices
    _distributed.initialize_from_flags(FLAGS)
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from framp_jax.simulate import run
    res = run(FLAGS.config, FLAGS.workdir, resume=FLAGS.resume, progress=FLAGS.progress)
    if not _distributed.is_writer():
        return
    final = res["final"]
    print(f"{res['method']} on {res['dataset']} seed {res['seed']}: {res['rounds']} rounds in "
          f"{res['wall_s']:.1f} s, round function compiled {res['compiles']}x")
    for split, d in final.items():
        print(f"  {split:13s} " + "  ".join(f"{k}={v:.4f}" for k, v in d.items()))
    print(f"results: {FLAGS.workdir}/results.json")


def main():
    from framp_jax.config import ConfigError
    try:
        app.run(_main)
    except ConfigError as e:
        sys.exit(f"framp-jax: bad config: {e}")
    except _distributed.DistributedError as e:
        sys.exit(f"framp-jax: {e}")


if __name__ == "__main__":
    main()
