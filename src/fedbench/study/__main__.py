from fedbench.study import main

main()
