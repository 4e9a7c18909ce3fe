"""mmdiff.data"""
