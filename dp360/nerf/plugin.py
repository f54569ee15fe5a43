"""dp360's methods as a nerfstudio plugin: the entry points `dp360-head` and `dp360-splat` of the
group `nerfstudio.method_configs` (pyproject.toml) name `dp360_head` and `dp360_splat`, so
nerfstudio's commands know the methods: `ns-train dp360-head --data RUN/views`, and `ns-viewer`,
`ns-render` and `ns-export` with `--load-config RUN/nerf/dp360/dp360-head/fit/config.yml`.

nerfstudio loads this module whenever it lists its methods (every `ns-*` command). Importing it
also lets `torch.load(weights_only=True)`, torch's default since 2.6, read the numpy scalars
that nerfstudio's trainer stores in its checkpoints (its schedulers' learning rates): nerfstudio
1.1.5's `eval_setup` loads checkpoints with the default and fails on every checkpoint otherwise.
Only numpy's scalar and dtype types are allowed, which build no other objects.
"""

from __future__ import annotations

import torch
from nerfstudio.plugins.types import MethodSpecification

from .checkpoint import checkpoint_numpy_globals
from .common import FitSettings
from .method import DESCRIPTION, head_config
from .splat import DESCRIPTION as SPLAT_DESCRIPTION
from .splat import splat_config

torch.serialization.add_safe_globals(checkpoint_numpy_globals())

# The "gpu" preset (FitSettings' defaults), as `dp360 reconstruct` fits on CUDA; on a CPU add
# `--machine.device-type cpu`, and override any setting on the command line.
dp360_head = MethodSpecification(config=head_config(FitSettings()), description=DESCRIPTION)
# `--field splatfacto`: splatfacto for the head orbit (CUDA only, as gsplat), `ns-train dp360-splat --data RUN/views`.
dp360_splat = MethodSpecification(config=splat_config(FitSettings()), description=SPLAT_DESCRIPTION)
