"""Knowledge fusion across architectures (FuseLLM, Wan et al., ICLR 2024).

FuseLLM fuses source models of different architectures and vocabularies into
one target by training the target, continually, on the sources' next-token
distributions:

1. each source runs over the corpus; its top-k tokens and logits per
   position and its cross-entropy per text are streamed to safetensors shards
   (distributions.py, shards.py, stages.py);
2. every source vocabulary is mapped onto the target's (vocab.py) and each
   text's tokenizations are aligned by dynamic programming on edit distance
   (align.py);
3. the target trains on lambda * CLM + (1 - lambda) * CE(fused, target), the
   fused distribution chosen by MinCE or weighted by AvgCE (loss.py,
   train.py), with checkpoints and bit-identical resume.

`fuse(config_path, out_dir, resume)` (run.py) runs it all and writes the
fused target as an HF model dir; `build_fusion_testbed` (testbed.py) makes a
small problem to run it on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergekit_evolver.fusion.config import FusionConfig, load_fusion_config
from mergekit_evolver.fusion.run import fuse

if TYPE_CHECKING:
    from mergekit_evolver.fusion.testbed import FusionTestbed, build_fusion_testbed

__all__ = ["FusionConfig", "FusionTestbed", "build_fusion_testbed", "fuse", "load_fusion_config"]


def __getattr__(name: str):
    # The testbed pulls in lm-eval and the training code: loaded when asked for.
    if name in ("build_fusion_testbed", "FusionTestbed"):
        from mergekit_evolver.fusion import testbed

        return getattr(testbed, name)
    raise AttributeError(name)
