"""Inputs: corpora cut into blocks, anchor dictionaries and their translation, label-set files, the tiny world."""
