"""Presentation: reports rendered from a finished document and nothing else.

``terminal`` is the rich report (``run``, ``show``, ``diff``, ``agents``); ``junit``,
``markdown``, ``csv`` and ``html`` are the report files (``exports.write_reports`` writes
those asked for); ``facts`` holds the wording they share and ``fold`` the folding of long
range lists. This package imports ``udpreach.core`` and nothing else of udpreach: no trio,
no sockets, no store, no CLI.
"""
