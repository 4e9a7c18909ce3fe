"""Bridges to third-party tools; each module needs its own optional extra.

    lmms_eval   an lmms-eval model (``lmms-eval --model mmdiff``) and the local ``shapes_vqa`` task's
                data exporter; needs ``pip install 'mmdiff[lmms]'``

Importing this package imports nothing else.
"""
