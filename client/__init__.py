"""The Flower ClientApp side: a site's NIfTI data and manifest, local DP fine-tuning, gate queries."""
