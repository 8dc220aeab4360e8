"""Datasets, partitions and the device-resident client view of the data."""
