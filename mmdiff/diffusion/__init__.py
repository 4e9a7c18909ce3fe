"""mmdiff.diffusion"""
