"""File formats: each module reads one layout into numpy arrays (a
:data:`certnet.data.load.Split`)."""
