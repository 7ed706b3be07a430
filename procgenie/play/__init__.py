"""`procgenie play`: a web page on which a person plays the learned world with the keyboard.

`server.py` holds the aiohttp server (one world model, one rollout and one real Procgen level per
connection); `static/index.html` is the page that draws the frames and sends the keys.
"""
