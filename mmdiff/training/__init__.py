"""mmdiff.training"""
