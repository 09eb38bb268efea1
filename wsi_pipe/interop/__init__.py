"""CLAM and TRIDENT projects, both ways: their h5/pt layouts read and written (torch only for .pt).

- `h5io`: the h5 layout both write (`save_hdf5` / `save_h5`: one-row chunks, resizable rows,
  attributes on the dataset) and what each loader reads from a coords file: the level-0 box of a
  CLAM tile (`patch_size` at `patch_level`) and of a TRIDENT tile (`patch_size` at the target
  magnification).
- `features`: a CLAM `h5_files/` or `pt_files/` folder, or a TRIDENT `features_<enc>/` folder,
  used as a feature set (slides matched to the manifest by file stem).
- `coords`: a CLAM `patches/` or TRIDENT `<mag>x_<px>px_<overlap>px_overlap/patches/` folder
  turned into wsi-pipe coords stores at the slides' true mpp.

The two conventions are described in docs/interop.md. Nothing here joins paths under a run
folder: callers pass the final paths from `RunLayout`.
"""
