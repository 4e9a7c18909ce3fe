"""mmdiff.models"""
