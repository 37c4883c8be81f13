from udpreach.launch import main

main()
