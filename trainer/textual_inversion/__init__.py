"""Textual inversion (Gal et al. 2022): new tokens whose embedding rows alone train."""
