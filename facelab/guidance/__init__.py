"""Guidance terms: small objects that plug into the sampling loop's hook points (see facelab.diffusion.loop).

Every term is a config in facelab/conf/guidance/ (`guidance=[NAME]` adds cfg.guidance.NAME):
  record        record.RecordTrajectory       x_t and x̂0 every few steps (method=generate writes trajectory.png)
  debias        debias.HSpaceDebias           h-space debiasing with an h-classifier (Balancing Act)
  debias_image  debias.ImageDebias            the image-space debiasing baseline (classifier on x̂0, ε held fixed)
  attribute     attribute.AttributeGuidance   attribute-classifier guidance toward targets, any denoiser
  hedit         hedit.DirectionEdit           one direction of a direction file added to h
  fuzzy         fuzzy.FuzzyImages             the FC-Diffusion blend toward an image folder or synthetic faces
  range         cyclediff.RangeGuidance       CycleDiff's range loss alone
  cycle, feature                              refused: they need method=cyclediff's per-batch source images
Classifier-style terms share base.GradientGuidance; base.refuse_guidance lets a method refuse, with one line, the
terms it cannot take (a term's `needs`).
"""
