"""OpenVision's towers: image (vit.py), text and caption decoder; sizes in variants.py."""
