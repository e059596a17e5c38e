"""The data formats both sides read: site manifests (:mod:`models.data.manifest`) and NIfTI scans
preprocessed onto the model grid (:mod:`models.data.site_data`). Pure nibabel/MONAI: a site reads its
private scans with it, the server its public cohort (the release's maps, validation)."""
