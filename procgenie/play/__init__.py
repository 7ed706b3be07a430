"""`procgenie play`: a web page on which people play the learned world with the keyboard.

`server.py` holds the aiohttp routes and the protocol; `gate.py` who may connect and how much they may send;
`hub.py` the one world model and the tick that steps every player together (`batch.py`); `game.py` one
player's state (a rollout and a real Procgen level); `static/` the page that draws the frames and sends the keys.
"""
