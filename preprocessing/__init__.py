"""Turn NIH Pancreas-CT, MSD Task07 and AbdomenCT-1K volumes into PNG slices + JSON annotations."""
