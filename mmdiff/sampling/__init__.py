"""mmdiff.sampling"""
