"""Trains the sample MANNs with RSN2 and writes them, with their accuracy records, into mann_edge/samples_data/.

    python sample_models/train.py                   # every sample (refuses to overwrite)
    python sample_models/train.py --only vision_text --force

The models, the data and the training are in `mann_edge.sample_training` (so that
`mann-edge demo --train` runs the same code); this is its command line.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from mann_edge import determinism  # noqa: E402  (imports nothing heavy)

determinism.prepare_environment()  # oneDNN limited to AVX2 before TensorFlow loads: the same weights on every CPU

from mann_edge.sample_training import main  # noqa: E402

if __name__ == "__main__":
    main()
