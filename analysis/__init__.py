"""Standalone analysis of exported vision encoders: probes, Grad-CAM, alignment, tables, figures."""
