"""ML-DCN, DCNv2 and MaskNet CTR models, and the numpy-only feature pipeline they share.

Importing ``model`` does not import torch: the feature schema and encoders
(``model.schema``, ``model.encoders``) are numpy-only so that the scoring service can use them.
The torch parts live in ``model.modules``, ``model.ctr`` and ``model.train``.
"""
