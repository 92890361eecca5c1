from ckv_cli.cli.app import main

main()
