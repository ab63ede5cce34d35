"""Every example run end to end in its smoke setting."""
