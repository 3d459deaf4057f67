"""The science: pure functions over arrays.

Stitching, illumination, segmentation, quantification, the overview and pyramids.
"""
