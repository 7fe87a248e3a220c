"""Real data for training and evaluation alike: Hugging Face datasets, image folders, EDM/EDM2 zips and the
offline digits, read within what the files hold."""
