"""mmdiff.world"""
