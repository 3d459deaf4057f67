"""The science: pure functions over arrays (stitching, illumination, segmentation, quantification, overview, pyramids)."""
