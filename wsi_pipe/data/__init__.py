"""Data for the torch stages: labelled / unlabelled ROI image collections (folders and CSVs,
`images.py`) and tile datasets read from slides at stored coordinates, with the DataLoader
pool that serves them (`tile_dataset.py`)."""
