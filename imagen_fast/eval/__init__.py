"""Evaluation instruments (``imagen-fast eval ...``): the Imagen paper's, for any cascade.

    drawbench.py    the 200 DrawBench prompts (package data), N images per prompt per
                    system, static HTML contact sheets per category
    fid.py          clean-fid resizing, Inception features, Frechet distance, cached
                    reference statistics, the FID-30K protocol on a COCO-format folder
    inception.py    InceptionV3 of the 2015-12-05 FID weights (a local file)
    clip_score.py   CLIP score with a CLIP model from a local folder
    sweep.py        guidance sweep: the CLIP score vs FID curve as a PNG
    serve/          the human rating protocol as a local web app over SQLite
    generator.py    what is evaluated: any ``prompts -> PIL images`` callable + settings
    shapes.py       compositional accuracy on held-out synthetic-shapes captions

Nothing here downloads: weights and models come from local paths.
"""
