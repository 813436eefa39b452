"""`mmstack.vision`: image intake, VL2 dynamic tiling, SigLIP towers, projectors, layout and grounding."""
