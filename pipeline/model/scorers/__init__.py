"""Comparison scorers (SPADE, PaDiM, PatchCore, WinCLIP, AnomalyDINO) behind one seam.

Each scorer reads the features of one extractor (``base.FeatureExtractor``), builds a normal
memory from a group's k references once (``build_memory``) and scores batches of queries
against it (``score``), returning an image score, named components and a patch map.
"""
