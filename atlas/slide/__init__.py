"""The slide convention: files of an uploaded slide, their validation, OME reading, Fiji import, the made sample."""
