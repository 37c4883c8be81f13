"""Server side: sends notification-shaped datagrams from chosen source ports."""
