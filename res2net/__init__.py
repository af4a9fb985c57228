"""Res2Net ImageNet training and evaluation recipe (Gao et al., TPAMI 2021)."""
