"""Raw shards (img2dataset's layout: KEY.jpg|png|webp, KEY.txt, KEY.json): their format, the
sources they are written from, the writer and the validator.
"""
