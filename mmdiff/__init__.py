"""mmdiff: multimodal masked (discrete) diffusion.

One bidirectional transformer reads and writes text tokens and VQ image tokens and sees
images through a vision encoder.  Sub-packages, in dependency order:

    world/      the embedded Shapes world (generator, ShapesEval analyser, real digits)
    data/       webdataset shards: reading with bad-sample accounting, converters, pipeline
    models/     backbone, vision-encoder and VQ adapters, the unified model
    diffusion/  schedules (shared by training and sampling) and training objectives
    sampling/   the sampling engine for text and image tokens
    training/   the accelerate trainer and checkpoints
    evaluation/ metrics, the eval runner and the report

Importing ``mmdiff`` is cheap: nothing heavy is imported and no global flag is set.
"""

__version__ = "0.1.0"
