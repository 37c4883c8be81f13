from udpreach._entry import main

main()
