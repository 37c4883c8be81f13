"""Client side: listens on UDP ports, registers its callback address, reports receipts."""
