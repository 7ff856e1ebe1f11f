from dinoreg.cli import main

main()
