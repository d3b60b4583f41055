from pixart_cli.cli.main import main

main()
