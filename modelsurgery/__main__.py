from modelsurgery.cli.app import main

main()
