from udpreach.cli import main

main()
