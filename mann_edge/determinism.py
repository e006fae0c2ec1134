"""Reproducible training: what makes a seeded RSN2 run give the same masks and weights, and what cannot.

A seed (`keras.utils.set_random_seed`, which every `mann_edge.rsn2` training call sets)
fixes the initial weights and the shuffles. Three more things decide the rounding of
every float sum, and so the bits of the result (each measured here on the sample):

- **Kernels.** TensorFlow's op determinism picks deterministic kernels, so a rerun in the
  same setting gives the same bits (`enable`).
- **Threads.** How a product is split among threads changes the order of its sums: one
  and two threads train the sample to different weights. `enable(threads=1)` fixes one
  intra-op and one inter-op thread, which TensorFlow allows only before its runtime starts
  (before the first model is built); then one core or two give the same weights.
- **The CPU's instruction set.** TensorFlow's CPU kernels for products and convolutions
  are oneDNN's (its matrix products even with ``TF_ENABLE_ONEDNN_OPTS=0``), and oneDNN picks
  them by instruction set when it starts (AVX2, AVX-512, AMX): limited to AVX2, the sample
  trains to other weights than with AVX-512. `prepare_environment` sets
  ``ONEDNN_MAX_CPU_ISA=AVX2``, which every x86-64 machine of this class has, so they all run
  the same kernels; it must run before TensorFlow is imported.

With all three, training repeats bit for bit in a new process, on one core or two
(`sample_models/README.md`). What can still differ: other versions of TensorFlow, Keras
or numpy; kernels whose blocking follows the CPU's cache sizes (not observed here, and
not ruled out); GPUs and CPUs other than x86-64.

This module imports nothing heavy, so that `prepare_environment` can run before TensorFlow.

Example:
    >>> prepare_environment()            # before anything imports TensorFlow
    True
    >>> enable(threads=1)
    {'op_determinism': True, 'threads': 1, 'isa': 'AVX2'}
"""

from __future__ import annotations

import os
import sys

__all__ = ["prepare_environment", "enable", "conditions"]

ISA_VARIABLE = "ONEDNN_MAX_CPU_ISA"
ISA = "AVX2"  # the newest instruction set every x86-64 machine of this class has
_enabled_here = False  # whether `enable` switched op determinism on (TensorFlow has no public getter)


def prepare_environment() -> bool:
    """Limits oneDNN to AVX2 kernels for this process, if TensorFlow is not imported yet.

    Returns whether the limit holds: True when this call (or the caller's environment)
    set ``ONEDNN_MAX_CPU_ISA`` before TensorFlow loaded. An explicit value is respected.
    """
    if "tensorflow" not in sys.modules:
        os.environ.setdefault(ISA_VARIABLE, ISA)
    return bool(os.environ.get(ISA_VARIABLE))


def enable(threads: int | None = None) -> dict:
    """Switches on TensorFlow's op determinism and, when asked and still possible, a fixed thread count.

    Args:
        threads: intra-op and inter-op threads to fix (1 makes the result independent of
            the core count); None leaves them. TensorFlow refuses once its runtime has
            started, in which case the threads are left and the result says so.

    Returns:
        `conditions()`: what holds now.

    Example:
        >>> enable()["op_determinism"]
        True
    """
    import tensorflow as tf

    global _enabled_here
    enable_op_determinism = getattr(tf.config.experimental, "enable_op_determinism", None)
    if enable_op_determinism is not None:
        enable_op_determinism()
        _enabled_here = True
    if threads is not None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(int(threads))
        except RuntimeError:  # the runtime has started: the thread pools are made
            pass
    return conditions()


def conditions() -> dict:
    """What decides the bits of a training run in this process: op determinism, fixed threads, oneDNN's ISA.

    ``threads`` is the fixed intra-op thread count, or None when TensorFlow picks it (one
    per core); ``isa`` oneDNN's instruction-set limit. Example:
    ``{'op_determinism': True, 'threads': 1, 'isa': 'AVX2'}``.
    """
    import tensorflow as tf

    try:  # not in tf.config's public names; present since TensorFlow 2.9
        from tensorflow.python.framework.config import is_op_determinism_enabled
    except ImportError:
        is_op_determinism_enabled = None
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    return {
        "op_determinism": bool(is_op_determinism_enabled()) if is_op_determinism_enabled else _enabled_here,
        "threads": intra if intra and intra == inter else None,
        # oneDNN reads it when TensorFlow loads; None: the CPU's newest instruction set
        "isa": os.environ.get(ISA_VARIABLE) or None,
    }
