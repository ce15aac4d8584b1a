from nftdivert.cli import main

main()
