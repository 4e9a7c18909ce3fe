"""mmdiff.evaluation"""
