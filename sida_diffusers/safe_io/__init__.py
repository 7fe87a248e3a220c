"""Reading files that others made: restricted unpicklers (`pickles`), JSON / .npy / .npz / zip members / image
headers within what the file holds (`files`), and networks described by files, built on meta under a budget and
shape-checked before allocation (`model_files`)."""
